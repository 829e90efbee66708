# coding=utf-8
# Copyright 2025 The Google Research Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""IF-EVAL internal module - standalone evaluation library."""

from .evaluation import (
    InputExample,
    OutputExample,
    read_prompt_list,
    read_prompt_to_response_dict,
    test_instruction_following_loose,
    test_instruction_following_strict,
    write_outputs,
)
from .instructions_registry import INSTRUCTION_DICT

__all__ = [
    "InputExample",
    "OutputExample",
    "INSTRUCTION_DICT",
    "read_prompt_list",
    "read_prompt_to_response_dict",
    "test_instruction_following_loose",
    "test_instruction_following_strict",
    "write_outputs",
]
